"""Small fakes of libraries that cannot be installed on a CPU machine (TensorRT, cuda-python).

They stand in for the *libraries*, never for edgeseg's code: each mirrors the slice of the real
API that edgeseg calls, with the real signatures, return conventions and rules (cited per
module), records the calls, and fails the way the real library does when a rule is broken.
Tests put this folder first on ``sys.path`` through the ``fake_gpu`` fixture (tests/test_tensorrt_fakes.py).
"""
