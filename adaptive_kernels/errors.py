"""The package's own exception type."""


class ArgumentTypeError(TypeError, ValueError):
    """An argument of a type that is not accepted (a budget that is not a number, a model that is not
    a LLaVA, ...). A ``ValueError`` too, so that code catching the package's bad-input errors as
    ``ValueError`` sees these as well."""
