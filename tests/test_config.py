"""Home discovery, identity, and broken settings or roster files: one clear line, exit 2."""

import pytest
from conftest import World

from coordinator.localbroker import free_port


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    return lines[0]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('teams = "research"\n', "agents/scout/agent.toml: teams: Input should be a valid list"),
        ("teams = [\n", "agents/scout/agent.toml: not valid TOML"),
        ('team = ["research"]\n', "agents/scout/agent.toml: team: unknown key; check its spelling"),
        ('teams = ["Research"]\n', "agents/scout/agent.toml: teams: invalid team name 'Research'"),
    ],
)
def test_a_broken_agent_toml_is_one_line_naming_file_and_field(
    world: World, toml: str, expected: str
) -> None:
    (world.home / "agents" / "scout" / "agent.toml").write_text(toml)
    result = world.covey("inbox", "--as", "scout")  # only what names it is refused
    assert result.returncode == 2
    assert expected in one_line(result.stderr)
    others = world.covey("inbox", "--as", "writer")  # see test_broken_agent.py
    assert others.returncode == 0 and expected in one_line(others.stderr)


def test_a_broken_covey_toml_names_the_setting(world: World) -> None:
    (world.home / "covey.toml").write_text('max_body_bytes = "lots"\n[humans.ada]\n')
    result = world.covey("send", "scout", "hi")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "covey.toml: max_body_bytes" in line and "integer" in line


def test_a_misspelt_setting_is_refused(world: World) -> None:
    (world.home / "covey.toml").write_text('amqp_ulr = "amqp://x"\n')
    result = world.covey("inbox")
    assert result.returncode == 2
    assert "amqp_ulr: unknown key" in one_line(result.stderr)


def test_half_a_client_certificate_is_refused(world: World) -> None:
    (world.home / "covey.toml").write_text('tls_key = "/etc/covey/client.key"\n[humans.ada]\n')
    result = world.covey("inbox")
    assert result.returncode == 2
    assert "covey.toml: tls_cert and tls_key go together" in one_line(result.stderr)


def test_an_environment_variable_wins_over_covey_toml_and_is_named_when_wrong(
    world: World,
) -> None:
    world.extra_env["COVEY_DELIVERY_LIMIT"] = "zero"
    result = world.covey("topology", "apply")
    assert result.returncode == 2
    assert "environment variable COVEY_DELIVERY_LIMIT" in one_line(result.stderr)


def test_home_is_found_from_a_subdirectory_like_git(world: World) -> None:
    env = world.env
    del env["COVEY_HOME"]
    deep = world.home / "agents" / "scout" / "notes"
    deep.mkdir()
    result = world.covey("send", "writer", "from deep inside", cwd=deep, env=env)
    assert result.returncode == 0, result.stderr
    assert [m["subject"] for m in world.json("inbox", "--as", "writer")] == ["from deep inside"]


def test_identity_comes_from_as_then_covey_agent_then_the_configured_default(
    world: World,
) -> None:
    world.ok("send", "loner", "from the default")  # covey.toml says human:ada
    world.extra_env["COVEY_AGENT"] = "scout"
    world.ok("send", "loner", "from COVEY_AGENT")
    world.ok("send", "loner", "from --as", "--as", "writer")
    senders = {m["subject"]: m["sender"] for m in world.json("inbox", "--as", "loner")}
    assert senders == {
        "from the default": "human:ada",
        "from COVEY_AGENT": "agent:scout",
        "from --as": "agent:writer",
    }


def test_an_unknown_or_missing_identity_is_bad_input(world: World) -> None:
    result = world.covey("inbox", "--as", "ghost")
    assert result.returncode == 2
    assert "agent:ghost is not in the roster" in one_line(result.stderr)
    (world.home / "covey.toml").write_text("[humans.ada]\n")
    result = world.covey("inbox")
    assert result.returncode == 2
    assert "does not know who you are" in one_line(result.stderr)


def test_an_unreachable_broker_is_exit_4_in_one_line(world: World) -> None:
    world.amqp_url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    result = world.covey("send", "scout", "anyone there?")
    assert result.returncode == 4
    line = one_line(result.stderr)
    assert "cannot reach RabbitMQ" in line and "COVEY_AMQP_URL" in line


def test_a_wrong_password_is_exit_4_in_one_line(world: World) -> None:
    world.amqp_url = world.amqp_url.replace("guest:guest", "guest:wrong")
    result = world.covey("inbox", "--as", "scout")
    assert result.returncode == 4
    assert "refused the login" in one_line(result.stderr)
