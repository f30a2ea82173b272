"""A stand-in for TensorFlow, only for running the HEAR validator on musicssl's PyTorch models.

hearvalidator 2021.0.2 imports tensorflow at the top of validate.py. For a torch model it uses one
name, `isinstance(model, tf.Module)`, to tell TensorFlow models from PyTorch ones; everything else it
does with tensorflow is on the TensorFlow-model path. Installing TensorFlow (several hundred MB) for
that one check is not worth it, so this package is put on PYTHONPATH for the validator alone: by
the HEAR step in .ci/run and by tests/test_hear.py, which takes it off sys.path again afterwards.
"""


class Module:
    """Nothing is an instance of this, so the validator takes every model it sees for a torch one."""


def __getattr__(name: str):
    raise AttributeError(f"tensorflow.{name}: this is tests/stubs/tensorflow, a stand-in for the HEAR validator, "
                         "not TensorFlow")
