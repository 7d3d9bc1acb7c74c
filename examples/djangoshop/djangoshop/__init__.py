"""The example Django project (see the README, "With Django")."""
