"""Campaigns: scan a whole zoo, calibrate a detector, report."""
