"""TPC-H Q1 as a podpipe pipeline over `lineitem`."""
