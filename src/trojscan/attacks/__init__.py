"""The attack side: corpora in, poisoned training sets, fine-tuned models and zoo manifests
out. The scanner never imports it, nor it the scanner (the import-linter contracts in
pyproject.toml)."""
