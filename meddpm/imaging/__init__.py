"""Label masks on their grid, the mapping to the network grid and back, memory estimates, phantoms."""
