"""LESS-style selection of training data by gradient similarity: the method (`method`) and its
gradient datastore (`gradients`)."""
from methods.less.method import LESS, LESSConfig, target_examples  # noqa: F401  (importing registers the method)
