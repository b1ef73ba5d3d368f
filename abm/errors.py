"""The one exception type whose message is shown to a user as-is."""


class ScenarioError(Exception):
    """Bad user input: the message names the file, the field and what is allowed."""
