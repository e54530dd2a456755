"""`python -m onnxcomp ...` is the same as the `onnxcomp` console script."""

from onnxcomp.cli import run

if __name__ == "__main__":
    run()
