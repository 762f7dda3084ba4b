"""Constants the reward-server tests share (a module of its own: `from conftest import ...` resolves to whichever
conftest pytest imported last when several test folders run together)."""

TOKEN_ENV = "FF_TEST_REWARD_TOKEN"
TOKEN = "s3cret-test-token"
