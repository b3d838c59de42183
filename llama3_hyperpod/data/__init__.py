"""Data preparation: text corpora -> packed, tokenized Arrow datasets in the layout NxDT loads with `load_from_disk`.

Importing this package is cheap; the heavy libraries (datasets, tokenizers, pyarrow) load inside the functions.
"""
