"""Tests of the procedural 2D scene task families (omnimini.data.scenes)."""

from __future__ import annotations

import io
import json

import pytest

from omnimini.data.scenes import EVAL_SEEDS, FAMILIES, TRAIN_SEEDS, SceneError, episodes, get_family
from omnimini.data.scenes.parsing import normalise, parse_choice, parse_short


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_train_and_eval_seeds_are_disjoint():
    assert set(TRAIN_SEEDS).isdisjoint(EVAL_SEEDS)
    assert max(TRAIN_SEEDS) < min(EVAL_SEEDS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_gives_identical_episode(family):
    fam = get_family(family)
    for seed in (3, 10_000_001):
        a, b = fam.episode(seed), fam.episode(seed)
        assert _png(a.image) == _png(b.image)
        assert (a.prompt, a.answer, a.subset, a.choices) == (b.prompt, b.answer, b.subset, b.choices)
    assert fam.episode(1).prompt != fam.episode(2).prompt or _png(fam.episode(1).image) != _png(
        fam.episode(2).image)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_answer_scores_one_in_every_subset(family):
    fam = get_family(family)
    for subset in fam.subsets:
        for ep in episodes(family, range(8), subset):
            assert ep.family == family and ep.subset == subset
            assert ep.image.size == (224, 224) and ep.image.mode == "RGB"
            res = fam.score(ep, ep.answer)
            assert res["success"] and res["score"] == 1.0, (ep.prompt, ep.answer, res)
            assert 0.0 <= fam.score(ep, "I do not know.")["score"] < 1.0


def test_bad_input_is_reported():
    with pytest.raises(SceneError, match="unknown scene task family"):
        get_family("nope")
    with pytest.raises(SceneError, match="subset"):
        get_family("qa").episode(0, "nope")
    with pytest.raises(SceneError, match="seed"):
        get_family("qa").episode(-1)


# ---------------------------------------------------------------- qa


@pytest.mark.parametrize(
    "response",
    ["B", "B.", "(B)", "**B**", "b) red", "The answer is (B)", "Answer: B", "red", "The answer is red.",
     "I think it is B because the shape looks red.", "**B. red**"],
)
def test_parse_choice_accepts_common_formats(response):
    assert parse_choice(response, ["blue", "red", "green", "yellow"]) == "B"


def test_parse_choice_does_not_read_articles_or_guess():
    choices = ["blue circle", "red square", "green star", "yellow triangle"]
    assert parse_choice("A red square.", choices) == "B"
    assert parse_choice("a red square", choices) == "B"
    assert parse_choice("no idea", choices) is None
    assert parse_choice("B or C", choices) is None


def test_parse_short_normalises():
    assert normalise("**Two.**") == "2"
    assert parse_short("Two.", [str(i) for i in range(13)]) == "2"
    assert parse_short("There are 3 red objects.", [str(i) for i in range(13)]) == "3"
    assert parse_short("The Red Circle!", ["red circle", "blue square"]) == "red circle"
    assert parse_short("It is to the LEFT of it", ["left", "right", "above", "below"]) == "left"
    assert parse_short("left or right", ["left", "right", "above", "below"]) is None
    assert parse_short("Grey", ["gray", "red"]) == "gray"


def test_qa_has_both_formats_and_wrong_answers_fail():
    fam = get_family("qa")
    eps = list(episodes("qa", range(40)))
    assert {ep.meta["format"] for ep in eps} == {"mc", "short"}
    for ep in eps:
        if ep.choices:
            wrong = next(letter for letter in "ABCD"[: len(ep.choices)] if letter != ep.answer)
            assert fam.score(ep, f"The answer is ({ep.answer})")["success"]
            assert fam.score(ep, ep.choices["ABCD".index(ep.answer)])["success"]
        else:
            wrong = next(c for c in ep.meta["candidates"] if normalise(c) != normalise(ep.answer))
            assert fam.score(ep, f"**{ep.answer.upper()}.**")["success"]
        assert fam.score(ep, wrong)["score"] == 0.0


def test_qa_counting_counts_visible_objects():
    from omnimini.data.scenes.world import Scene

    for ep in episodes("qa", range(30), "counting"):
        scene = Scene.from_dict(ep.meta["scene"])
        if ep.meta["qtype"] == "count_total":
            assert ep.meta["answer_text"] == str(len(scene.visible_objects()))


def test_caption_lists_objects_in_reading_order():
    """Captions are a function of the image: objects top band first, left to right, so nothing is arbitrary."""
    import random

    from omnimini.data.scene_samples import scene_caption
    from omnimini.data.scenes.world import generate_scene

    for i in range(20):
        scene = generate_scene(random.Random(f"caption-test/{i}"))
        text = scene_caption(scene)
        objs = scene.visible_objects()
        where = [text.index(f" {o.colour} {o.shape} ") for o in objs]
        band = [0 if o.y < 1 / 3 else (2 if o.y > 2 / 3 else 1) for o in objs]
        order = sorted(range(len(objs)), key=where.__getitem__)
        assert [(band[k], objs[k].x) for k in order] == sorted((band[k], objs[k].x) for k in order), text
        assert text == scene_caption(generate_scene(random.Random(f"caption-test/{i}")))


# ---------------------------------------------------------------- pointing


def test_parse_points_formats():
    from omnimini.data.scenes.pointing import parse_points

    assert parse_points("(0.41, 0.72)") == [(0.41, 0.72)]
    assert parse_points("Points: [(0.1, 0.2), (0.3,0.4)]") == [(0.1, 0.2), (0.3, 0.4)]
    assert parse_points('```json\n[{"x": 0.5, "y": 0.25}]\n```') == [(0.5, 0.25)]
    assert parse_points('{"points": [[12, 200]]}') == [(12.0, 200.0)]
    assert parse_points("x=0.3, y=0.9") == [(0.3, 0.9)]
    assert parse_points("somewhere on the left") == []


def test_pointing_points_inside_mask_score_one_outside_zero():
    from omnimini.data.scenes.pointing import in_mask, mask_points

    fam = get_family("pointing")
    for ep in episodes("pointing", range(12)):
        inside = mask_points(ep.meta, 32)
        outside = [((i + 0.5) / 32, (j + 0.5) / 32) for j in range(32) for i in range(32)]
        outside = [p for p in outside if not in_mask(ep.meta, *p)]
        assert inside and outside
        pts = inside[:: max(1, len(inside) // 3)][:3]
        assert fam.score(ep, str(pts))["score"] == 1.0
        assert fam.score(ep, str(outside[:2]))["score"] == 0.0
        mixed = fam.score(ep, str([inside[0], outside[0]]))
        assert mixed["score"] == 0.5 and not mixed["success"]
        # Pixel coordinates of the same point are accepted.
        px = [(round(x * 224, 1), round(y * 224, 1)) for x, y in pts]
        assert fam.score(ep, json.dumps(px))["score"] == 1.0
        assert fam.score(ep, "no idea")["score"] == 0.0


def test_pointing_mask_excludes_objects_and_follows_relation():
    from omnimini.data.scenes.pointing import in_mask

    for ep in episodes("pointing", range(20)):
        for ox, oy, _ in ep.meta["obstacles"]:
            assert not in_mask(ep.meta, ox, oy)
        if ep.meta["relation"] == "left":
            grid = [(i / 50, j / 50) for i in range(51) for j in range(51)]
            assert all(x <= ep.meta["region"]["x1"] for x, y in grid if in_mask(ep.meta, x, y))


# ---------------------------------------------------------------- planning


def _tiny_world():
    from omnimini.data.scenes.planning import PlanWorld

    recs = {"table": {"slot": [0, 0], "closable": False, "open": True},
            "fridge": {"slot": [1, 0], "closable": True, "open": False}}
    objs = {"apple_1": {"type": "apple", "colour": "red", "at": "table"},
            "cup_2": {"type": "cup", "colour": "blue", "at": "table"}}
    return PlanWorld(recs, objs, [["in", "apple_1", "fridge"], ["closed", "fridge"]])


def test_planning_simulator_checks_preconditions():
    from omnimini.data.scenes.planning import InvalidAction, PlanSim

    sim = PlanSim(_tiny_world())
    with pytest.raises(InvalidAction, match="not at"):
        sim.step("pick", ["apple_1"])
    sim.step("goto", ["apple_1"])
    sim.step("pick", ["apple_1"])
    with pytest.raises(InvalidAction, match="already holds"):
        sim.step("pick", ["cup_2"])
    sim.step("goto", ["fridge"])
    with pytest.raises(InvalidAction, match="closed"):
        sim.step("place", ["apple_1", "fridge"])
    with pytest.raises(InvalidAction, match="unknown skill"):
        sim.step("teleport", ["fridge"])
    with pytest.raises(InvalidAction, match="unknown receptacle"):
        sim.step("goto", ["garage"])
    sim.step("open", ["fridge"])
    with pytest.raises(InvalidAction, match="already open"):
        sim.step("open", ["fridge"])
    sim.step("place", ["apple_1", "fridge"])
    assert not all(sim.goal_holds(g) for g in sim.world.goals)  # fridge still open
    sim.step("close", ["fridge"])
    assert all(sim.goal_holds(g) for g in sim.world.goals)


def test_planning_reference_plan_is_shortest_on_tiny_world():
    from omnimini.data.scenes.planning import PlanSim, plan_reference

    plan = plan_reference(_tiny_world())
    assert [s for s, _ in plan] == ["goto", "pick", "goto", "open", "place", "close"]
    assert PlanSim(_tiny_world()).run(plan)["success"]


def test_parse_plan_formats():
    from omnimini.data.scenes.planning import parse_plan

    want = [("goto", ["table"]), ("pick", ["apple_1"]), ("place", ["apple_1", "fridge"])]
    assert parse_plan("goto(table)\npick(apple_1)\nplace(apple_1, fridge)") == want
    assert parse_plan("Plan:\n1. goto(table)\n2. pick('apple_1')\n3. place(apple_1, fridge)\nDone.") == want
    assert parse_plan('["goto(table)", "pick(apple_1)", "place(apple_1, fridge)"]') == want
    assert parse_plan('[{"skill": "goto", "args": ["table"]}, {"action": "pick", "args": ["apple_1"]},'
                      ' {"skill": "place", "args": ["apple_1", "fridge"]}]') == want
    assert parse_plan("- goto table\n- pick apple_1\n- place apple_1 in fridge") == want


def test_planning_reference_succeeds_for_every_subset_and_broken_plans_fail():
    from omnimini.data.scenes.planning import format_plan, parse_plan

    fam = get_family("planning")
    for subset in fam.subsets:
        for ep in episodes("planning", range(20), subset):
            res = fam.score(ep, ep.answer)
            assert res["success"] and res["score"] == 1.0, (ep.prompt, ep.answer, res)
            plan = parse_plan(ep.answer)
            assert len(plan) == ep.meta["optimal_length"]
            assert not fam.score(ep, format_plan(plan[:-1]))["success"]
            assert not fam.score(ep, format_plan(plan[1:]))["success"]
            if subset == "long_horizon":
                assert len([g for g in ep.meta["goals"] if g[0] == "in"]) >= 4
    assert not fam.score(fam.episode(0, "base"), "")["success"]


# ---------------------------------------------------------------- navigation


def test_navigation_reference_succeeds_and_random_policy_mostly_fails():
    import random

    fam = get_family("navigation")
    random_wins = 0
    for ep in episodes("navigation", range(30)):
        res = fam.score(ep, ep.answer)
        assert res["success"] and res["spl"] == 1.0 and res["steps"] == ep.meta["shortest"] <= 20
        detour = "turn_left\nturn_right\n" + ep.answer
        res = fam.score(ep, detour)
        assert res["success"] and 0.0 < res["spl"] < 1.0
        rng = random.Random(ep.seed)
        acts = [rng.choice(["forward", "turn_left", "turn_right"]) for _ in range(19)] + ["stop"]
        random_wins += fam.score(ep, "\n".join(acts))["success"]
        assert not fam.score(ep, "stop")["success"]
    assert random_wins <= 6


def test_nav_env_interactive():
    from omnimini.data.scenes import NavEnv

    ep = get_family("navigation").episode(5)
    env = NavEnv(5)
    img, text = env.observe()
    assert _png(img) == _png(ep.image) and "facing" in text
    for a in ep.answer.splitlines():
        img, text, done = env.step(a)
    assert done and env.result() == {"success": True, "spl": 1.0, "steps": ep.meta["shortest"]}
    with pytest.raises(SceneError, match="over"):
        env.step("forward")
    with pytest.raises(SceneError, match="unknown navigation action"):
        NavEnv(5).step("jump")
    env = NavEnv(5)
    for _ in range(20):
        *_, done = env.step("turn_left")
    assert done and not env.result()["success"]


def test_parse_actions_formats():
    from omnimini.data.scenes.navigation import parse_actions

    assert parse_actions("1. Move forward\n2. turn left\nforward x2\nThe star is on my right.\nSTOP") == [
        "forward", "turn_left", "forward", "forward", "stop"]
    assert parse_actions('["forward", "turn_right", "stop"]') == ["forward", "turn_right", "stop"]
    assert parse_actions("forward, forward, then turn_left, stop") == ["forward", "forward", "turn_left", "stop"]


# ---------------------------------------------------------------- preview CLI


def test_preview_cli_writes_files(tmp_path):
    from omnimini.data.scenes.__main__ import main

    main(["--preview", str(tmp_path), "--n", "2", "--seed", "7"])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2 * len(FAMILIES) and "qa_7.png" in pngs
    md = (tmp_path / "samples.md").read_text()
    assert "## planning" in md and "**Answer**" in md
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(FAMILIES) and all(r["prompt"] and r["answer"] for r in rows)


def test_nav_chat_env_runs_replies():
    fam = get_family("navigation")
    ep = fam.episode(9)
    env = fam.make_env(ep)
    obs = env.step(ep.answer)
    assert env.done and env.result()["success"] and "facing" in obs["text"]
    env = fam.make_env(ep)
    for _ in range(env.max_steps):
        if env.done:
            break
        env.step("I am not sure.")
    assert env.done and not env.result()["success"]


def test_receptacle_question_when_every_object_is_hidden():
    """All objects inside closed containers leaves none visible: the generator must decline (None) or ask about
    a container, never fail (the full `nano` recipe's SFT stage hit this after ~1000 steps)."""
    import random

    from omnimini.data.scenes.qa import q_receptacle
    from omnimini.data.scenes.world import generate_scene

    hidden = 0
    for i in range(300):
        rng = random.Random(i)
        scene = generate_scene(rng, n_receptacles=(2, 2), inside_prob=1.0, closed_prob=1.0)
        hidden += not scene.visible_objects()
        q = q_receptacle(rng, scene)
        assert q is None or q.answer in q.candidates
    assert hidden > 0  # the case really occurs


def test_balanced_qa_flattens_the_answer_priors():
    """QAFamily(balanced=True), for training: each template's answer is drawn first, so the answers a model could
    guess without the image ("none" for containers, small counts) lose their weight; episodes stay valid."""
    import collections

    from omnimini.data.scenes.qa import QAFamily

    share = {}
    for bal in (False, True):
        fam = QAFamily(image_size=64, fmt="short", balanced=bal)
        eps = [fam.episode(s, "receptacle") for s in range(300)]
        got = collections.Counter(e.meta["answer_text"] for e in eps if e.meta["qtype"] == "container")
        share[bal] = got["none"] / sum(got.values())
        assert all(fam.score(e, e.answer)["success"] for e in eps[:40])
    assert share[False] > 0.5 and share[True] < 0.75 * share[False]


def test_qa_conversation_asks_distinct_questions_about_one_scene():
    from omnimini.data.scenes.qa import QAFamily

    fam = QAFamily(image_size=64)
    image, turns = fam.conversation(11)
    again_image, again = fam.conversation(11)
    assert turns == again and image.tobytes() == again_image.tobytes()  # a pure function of the seed
    assert 4 <= len(turns) <= 8
    assert turns[0][0].startswith("The image is a top-down view") and not any(
        q.startswith("The image is") for q, _ in turns[1:])  # the intro once, in the first turn
    assert len({q for q, _ in turns}) == len(turns)
    for q, a in turns:  # each answer is what its question's own instruction asks for
        if "letter of the correct option" in q:
            assert a in "ABCD"
        elif "single number" in q:
            assert a.isdigit()
    assert fam.conversation(12)[1] != turns
