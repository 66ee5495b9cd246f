"""The demo app: the neighbours a newcomer needs to see a saga run (participants, auth service,
demo staff, seed data). Installed only by orchestration_site.settings_demo and tests/settings.py;
the production image does not contain it."""
