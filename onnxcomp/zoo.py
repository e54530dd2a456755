"""Reference architectures built directly in ONNX (placeholder until the zoo lands)."""

ZOO: dict = {}


def build(name: str, seed: int = 0):
    raise NotImplementedError(name)
