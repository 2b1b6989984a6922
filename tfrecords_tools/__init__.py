"""Converters of public and custom datasets into the imcl_tf TFRecord schema."""
