"""Preference and prompt data: sources, formats, validation, tokenisation."""
