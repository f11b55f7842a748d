"""HTTP routes (aiohttp): thin handlers over services; errors translated by one middleware."""
