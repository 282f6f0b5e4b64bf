"""The unit tier: no root, no sandbox, no daemon, no network; seconds in all."""
