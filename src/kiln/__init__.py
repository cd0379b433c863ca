"""kiln: compress → compile → evaluate → artifact, from one recipe.

Importing this package stays cheap (no torch): the CLI imports the heavy stages lazily.
"""

__version__ = "0.1.0"
