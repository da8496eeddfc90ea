"""The one exception type the CLI turns into a clean message and exit code.

Every error a user can act on is raised as `SdrecipeError` (or a subclass): its
text says what went wrong, where (file:line, URL, path) and what to do next.
Anything else escaping to the CLI is a bug and keeps its traceback.
"""


class SdrecipeError(Exception):
    """An error the user can act on."""

    exit_code = 2


class RecipeError(SdrecipeError):
    """Invalid recipe data, located at `file:line` and a dotted field path."""

    def __init__(self, file, line, field, message):
        self.file, self.line, self.field = str(file), line, field
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
