import json

from llmplatform.jsonbody import MAX_JSON_DEPTH, json_body_problem


def test_a_body_of_plain_text_at_any_allowed_depth_has_no_problem():
    nested = json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))
    assert json_body_problem({"messages": [{"role": "user", "content": "h\u00e9llo \U0001f600"}], "x": nested}) is None


def test_a_body_nested_one_level_too_deep_is_refused_as_a_whole():
    problem = json_body_problem(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)))
    assert problem.param is None
    assert problem.sentence == f"The request body is nested more than {MAX_JSON_DEPTH} levels deep."


def test_the_first_lone_surrogate_is_named_by_its_path_and_not_repeated():
    body = json.loads('{"a": "ok", "messages": [{"content": [{"text": "x\\ud800"}]}], "z": "\\udfff"}')
    problem = json_body_problem(body)
    assert problem.param == "messages[0].content[0].text"
    assert "\ud800" not in problem.sentence and problem.sentence.startswith("'messages[0].content[0].text' must be")


def test_a_key_with_a_lone_surrogate_names_the_object_that_holds_it():
    assert json_body_problem(json.loads('{"meta": {"\\ud800": 1}}')).param == "meta"
    assert json_body_problem(json.loads('{"\\ud800": 1}')).sentence.startswith("The request body has a key")
    assert json_body_problem(json.loads('["\\ud800"]')).param == "[0]"
