"""The model layer: pipeline specs and their graph, as pure, frozen data."""
