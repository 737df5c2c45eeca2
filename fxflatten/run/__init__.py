"""Running a graph over calibration data: block by block (the segment runner), with the
activations between blocks spilled to disk, and the time and memory of each step measured."""
