"""UI-format workflow -> API prompt, on hand-made workflows with a known answer."""
from __future__ import annotations

import pytest

from harness.workflow import ui_to_api

OBJECT_INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"]]}},
               "input_order": {"required": ["ckpt_name"]}},
    "Sampler": {"input": {"required": {"model": ["MODEL"],
                                       "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}],
                                       "cfg": ["FLOAT", {"default": 8.0}]},
                          "optional": {"note": ["STRING", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "cfg"], "optional": ["note"]}},
}


def node(id_, type_, widgets, inputs=(), mode=0):
    return {"id": id_, "type": type_, "mode": mode, "widgets_values": list(widgets),
            "inputs": [{"name": n, "link": link} for n, link in inputs]}


def test_links_and_widgets_map_to_named_inputs_skipping_the_seed_control_value():
    wf = {"nodes": [node(1, "Loader", ["b.safetensors"]),
                    node(2, "Sampler", [42, "randomize", 30, 6.5, "hi"], inputs=[("model", 7)]),
                    node(3, "Note", ["text"])],
          "links": [[7, 1, 0, 2, 0, "MODEL"]]}
    assert ui_to_api(wf, OBJECT_INFO) == {
        "1": {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"}},
        "2": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 30, "cfg": 6.5,
                                                  "note": "hi"}},
    }


def test_a_widget_turned_into_an_input_takes_the_link_and_keeps_its_slot():
    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]),
                    node(2, "Sampler", [1, "fixed", 10, 2.0], inputs=[("model", 1), ("steps", 2)]),
                    node(4, "Loader", ["a.safetensors"], mode=2)],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 9, 0, 2, 2, "INT"]]}
    inputs = ui_to_api(wf, OBJECT_INFO)["2"]["inputs"]
    assert inputs == {"model": ["1", 0], "steps": ["9", 0], "seed": 1, "cfg": 2.0}


@pytest.mark.parametrize("wf,message", [
    ({"nodes": [node(1, "Nope", [])], "links": []}, "does not know"),
    ({"nodes": [node(1, "Loader", ["a"], mode=4)], "links": []}, "bypassed"),
    ({"nodes": [node(2, "Sampler", [1, "fixed", 1, 1.0], inputs=[("model", 5)])], "links": []}, "missing link"),
])
def test_unsupported_or_broken_workflows_are_refused(wf, message):
    with pytest.raises(ValueError, match=message):
        ui_to_api(wf, OBJECT_INFO)


CHECK_INFO = {
    **OBJECT_INFO,
    "Loader": {**OBJECT_INFO["Loader"], "output": ["MODEL"]},
    "Sampler": {**OBJECT_INFO["Sampler"], "output": ["LATENT"]},
    "Picker": {"input": {"required": {"mode": ["COMBO", {"options": ["fast", "exact"]}],
                                      "scale": ["FLOAT", {"min": 0.0, "max": 2.0}],
                                      "flag": ["BOOLEAN", {}]}},
               "input_order": {"required": ["mode", "scale", "flag"]}, "output": ["LATENT"]},
    "Sink": {"input": {"required": {"latent": ["LATENT"]}, "optional": {"any": ["*"]}},
             "input_order": {"required": ["latent"], "optional": ["any"]}, "output": []},
}


def test_a_valid_workflow_has_no_problems():
    from harness.workflow import check_workflow

    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]), node(2, "Sampler", [3, "fixed", 10, 7.0],
                                                                   inputs=[("model", 1)]),
                    node(3, "Picker", ["exact", 1.5, True]), node(4, "Sink", [], inputs=[("latent", 2), ("any", 3)]),
                    node(5, "Note", ["hello"])],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 4, 0, "LATENT"], [3, 3, 0, 4, 1, "LATENT"]]}
    assert check_workflow(wf, CHECK_INFO) == []


@pytest.mark.parametrize("change,expected", [
    (lambda wf: wf["nodes"][0]["widgets_values"].__setitem__(0, "c.safetensors"), "'c.safetensors' is not one of"),
    (lambda wf: wf["nodes"][2]["widgets_values"].__setitem__(0, "slow"), "'slow' is not one of its 2 choices"),
    (lambda wf: wf["nodes"][2]["widgets_values"].__setitem__(1, 2.5), "above its maximum 2.0"),
    (lambda wf: wf["nodes"][2]["widgets_values"].__setitem__(1, float("nan")), "is NaN"),
    (lambda wf: wf["nodes"][2]["widgets_values"].__setitem__(2, "yes"), "is not a boolean"),
    (lambda wf: wf["nodes"][1]["widgets_values"].__setitem__(2, 2.5), "not a whole number"),
    (lambda wf: wf["links"].__setitem__(1, [2, 1, 0, 4, 0, "MODEL"]), "gives MODEL, but node 4 (Sink) input 'latent' takes LATENT"),
    (lambda wf: wf["nodes"][3]["inputs"][0].__setitem__("link", None), "'latent': required, but neither"),
    (lambda wf: wf["nodes"][0].__setitem__("type", "Gone"), "type 'Gone' is unknown"),
])
def test_each_kind_of_problem_is_named(change, expected):
    from harness.workflow import check_workflow

    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]), node(2, "Sampler", [3, "fixed", 10, 7.0],
                                                                   inputs=[("model", 1)]),
                    node(3, "Picker", ["exact", 1.5, True]), node(4, "Sink", [], inputs=[("latent", 2)])],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 4, 0, "LATENT"]]}
    change(wf)
    problems = check_workflow(wf, CHECK_INFO)
    assert len(problems) == 1 and expected in problems[0], problems
