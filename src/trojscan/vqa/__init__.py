"""What both sides of a VQA backdoor share: the frozen image backbone that plays the object
detector, images and patches, the cache of box features, and the VQA model families with
their directory format. Imports neither the zoo builder nor the scanner."""
