"""Small helpers shared by the engine and the tools, importable without detectron2."""
