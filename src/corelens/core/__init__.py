"""The model core: ``HookedMLLM`` (``model``), the inputs it prepares (``prepare``), the
decoder attention forward corelens owns (``attention``) and teacher-forced ``evaluate``."""
