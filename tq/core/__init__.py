"""Core math and file formats: Lloyd-Max codebooks, rotations, bit packing, atomic files."""
