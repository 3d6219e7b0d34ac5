"""`shapes`: procedural images of coloured shapes with a class label and an English caption (see `shapes.py`)."""

from zoo.data.builders.shapes.shapes import COLOURS, NUM_CLASSES, RELATIONS, SHAPES, SIZES, TASK, Shapes

__all__ = ["COLOURS", "NUM_CLASSES", "RELATIONS", "SHAPES", "SIZES", "TASK", "Shapes"]
