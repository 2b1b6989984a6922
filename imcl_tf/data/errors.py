"""DataError: the exception for bad input data (datasets, annotations, converter input)."""


class DataError(ValueError):
    """Bad input data: the message says what, where (file, record) and what to do."""
