"""Reading run directories into tables, statistics (`stats`), the markdown report (`report`) and
pictures of tasks (`show`)."""
