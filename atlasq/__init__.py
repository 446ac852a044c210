"""atlasq: inspect image datasets through an activation atlas of InceptionV1."""

__version__ = "0.1.0"
