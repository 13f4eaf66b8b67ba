"""Local, windowed and strided attention patterns (1-D and 2-D)."""
