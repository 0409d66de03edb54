"""Runbell's Metaflow extension: the ``@runbell`` step decorator (``--with runbell``).

Metaflow finds this through the installed ``metaflow_extensions`` namespace package (no
``__init__.py`` above this folder, as Metaflow requires) and resolves the class path lazily.
"""

STEP_DECORATORS_DESC = [("runbell", ".runbell_decorator.RunbellDecorator")]
