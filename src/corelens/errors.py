"""Errors that name the problem and the fix."""


class CorelensError(Exception):
    """Base class of corelens's own errors.

    Every error corelens raises on purpose is one of its subclasses (``InputError``,
    ``LayoutError``, ``UnknownFamilyError``), each also a ``ValueError``, with a message that
    names the problem and the fix.

    Example:
        ```python
        import corelens

        try:
            corelens.get_family("gpt2")
        except corelens.CorelensError as err:  # here an UnknownFamilyError
            print(err)  # unknown family 'gpt2'; known: gemma3, idefics3, ...
        ```
    """


class UnknownFamilyError(CorelensError, ValueError):
    """The model's architecture is not one corelens supports.

    Example:
        ```python
        import corelens

        try:
            corelens.get_family("gpt2")
        except corelens.UnknownFamilyError as err:
            print(err)  # unknown family 'gpt2'; known: gemma3, idefics3, ...
        ```
    """


class LayoutError(CorelensError, ValueError):
    """Images, placeholders, tokens and boxes do not line up.

    Example:
        ```python
        from corelens import LayoutError, zoo

        model = zoo.load("toy-llava")
        layout = model.prepare_examples(zoo.examples("toy-llava", 1, seed=0)).layout
        try:
            layout.positions_in_box(0, (30, 30, 10, 10))  # x1 < x0: an empty box
        except LayoutError as err:
            print(err)  # example 0, image 0: box (30, 30, 10, 10) is empty: need x0 < x1 ...
        ```
    """


class InputError(CorelensError, ValueError):
    """Bad user input to ``prepare`` and friends.

    Example:
        ```python
        from corelens import Evidence, InputError

        try:
            Evidence.in_image(0, (0, 0, 10))  # three numbers
        except InputError as err:
            print(err)  # a box needs 4 numbers (x0, y0, x1, y1), got (0, 0, 10)
        ```
    """
