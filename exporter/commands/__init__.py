"""The ``events`` and ``check`` commands: the event stream shown to a person."""
