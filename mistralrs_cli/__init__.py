"""mistralrs-cli: a Python reimplementation of mistral.rs."""
