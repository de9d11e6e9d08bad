"""Input and output formats: decoding uploaded images, encoding results. Pluggable by media type."""
