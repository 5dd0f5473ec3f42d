"""The package's own exception type, and which error a refused argument gets."""


class ArgumentTypeError(TypeError, ValueError):
    """An argument of a type that is not accepted (a budget that is not a number, a model that is not
    a LLaVA, ...). A ``ValueError`` too, so that code catching the package's bad-input errors as
    ``ValueError`` sees these as well."""


def refusal(of_accepted_type: bool) -> type:
    """The error for a refused argument: ``ValueError`` for a value of an accepted type (out of range),
    ``ArgumentTypeError`` for one of another type."""
    return ValueError if of_accepted_type else ArgumentTypeError
