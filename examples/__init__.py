"""Examples built on jaxembed: research that lives beside the library, not in it."""
