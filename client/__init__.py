"""The thin retd client."""
