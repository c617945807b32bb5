"""podpipe: the pod pipeline pattern.

A pod pulls its shard of the data into RAM once; a graph of stages, each its own
process, transforms it in turn, each reading the previous stage's output straight
out of the pod's shared memory as memory-mapped Arrow IPC files.
"""

__version__ = "0.1.0"
