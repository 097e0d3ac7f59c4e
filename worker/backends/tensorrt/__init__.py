"""TensorRT backend: the only package that imports tensorrt or cuda; loaded only when chosen."""
