"""nanopipe.eval"""
