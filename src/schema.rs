//! JSON Schema of the protocol format, generated from the kind catalogue so it
//! always matches what `check` accepts. Editors (Taplo / Even Better TOML) use
//! it for completion and inline checking; `check` remains the authority
//! (volumes, tips, limits and references are beyond a schema).

use crate::catalogue::{
    ArgSpec, ArgType, BUILTIN_ACTIONS, COMMON_STEP_KEYS, DeviceKind, VIOLATION_POLICIES,
};
use crate::labware::builtin::builtin_names;
use crate::protocol::FORMAT;
use crate::units::Dimension;
use serde_json::{Map, Value, json};

const PARAM_PATTERN: &str = "^\\$\\{[^}]+\\}$";

fn quantity_schema(d: Dimension) -> Value {
    let string = json!({
        "type": "string",
        "description": format!("A {} ({}), e.g. {}, or ${{param}}", d.name(), d.units(), d.example()),
    });
    if d.accepts_bare_number() {
        json!({ "anyOf": [ { "type": "number" }, string ] })
    } else {
        string
    }
}

fn arg_schema(ty: ArgType, description: &str) -> Value {
    let mut v = match ty {
        ArgType::Quantity { dimension } => quantity_schema(dimension),
        ArgType::Wells => json!({
            "type": "string",
            "pattern": "^[^:]+:.+$",
            "examples": ["plate:A1", "plate:A1:H12", "plate:A1,B3,C5", "plate384:quadrant(1)"],
        }),
        ArgType::Labware | ArgType::Text | ArgType::Condition => json!({ "type": "string" }),
        ArgType::Location => {
            json!({ "type": "string", "pattern": "^[^:]+:([0-9]+|\\$\\{[^}]+\\})$", "examples": ["lh:3"] })
        }
        ArgType::Integer { min, max } => json!({
            "anyOf": [ { "type": "integer", "minimum": min, "maximum": max }, { "type": "string", "pattern": PARAM_PATTERN } ]
        }),
        ArgType::Bool => {
            json!({ "anyOf": [ { "type": "boolean" }, { "type": "string", "pattern": PARAM_PATTERN } ] })
        }
        ArgType::Choice { options } => json!({ "type": "string", "enum": options }),
        ArgType::Signals => json!({
            "anyOf": [ { "type": "array", "items": { "type": "string" }, "minItems": 1 }, { "type": "string" } ]
        }),
        ArgType::Mix => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["cycles", "volume"],
            "properties": {
                "cycles": arg_schema(ArgType::Integer { min: 1, max: 1000 }, "Cycles."),
                "volume": quantity_schema(Dimension::Volume),
            },
        }),
        ArgType::Pump => {
            let mut pumps: Vec<&str> = DeviceKind::ALL
                .iter()
                .flat_map(|k| k.spec().pumps.iter().copied())
                .collect();
            pumps.dedup();
            json!({ "type": "string", "enum": pumps })
        }
    };
    if let Value::Object(m) = &mut v {
        m.insert("description".into(), Value::String(description.to_string()));
    }
    v
}

fn step_schema() -> Value {
    // Every key any action takes; a key used with different types by different
    // actions (e.g. `to`: wells for transfer, a place for unload) gets anyOf.
    let mut by_key: Vec<(&str, Vec<Value>, Vec<&str>)> = Vec::new();
    let mut add = |a: &ArgSpec| {
        let schema = arg_schema(a.ty, a.description);
        match by_key.iter_mut().find(|(k, _, _)| *k == a.name) {
            Some((_, schemas, descriptions)) => {
                let stripped = strip_description(&schema);
                if !schemas.iter().any(|s| strip_description(s) == stripped) {
                    schemas.push(schema);
                }
                if !descriptions.contains(&a.description) {
                    descriptions.push(a.description);
                }
            }
            None => by_key.push((a.name, vec![schema], vec![a.description])),
        }
    };
    COMMON_STEP_KEYS.iter().for_each(&mut add);
    let mut actions = Vec::new();
    for a in BUILTIN_ACTIONS {
        a.args.iter().for_each(&mut add);
        actions.push(a.name.to_string());
    }
    for k in DeviceKind::ALL {
        for a in k.spec().actions {
            a.args.iter().for_each(&mut add);
            if !actions.contains(&a.name.to_string()) {
                actions.push(a.name.to_string());
            }
        }
    }
    let mut properties = Map::new();
    for (key, mut schemas, descriptions) in by_key {
        let schema = if schemas.len() == 1 {
            schemas.remove(0)
        } else {
            json!({ "anyOf": schemas, "description": descriptions.join(" / ") })
        };
        properties.insert(key.to_string(), schema);
    }
    let builtin: Vec<&str> = BUILTIN_ACTIONS.iter().map(|a| a.name).collect();
    let device_actions: Vec<String> = actions
        .iter()
        .filter(|a| !builtin.contains(&a.as_str()))
        .cloned()
        .collect();
    properties.insert(
        "do".into(),
        json!({
            "type": "string",
            "description": "`<role>.<action>` or a built-in: wait, wait_until, prompt, log",
            "pattern": format!("^([A-Za-z_][A-Za-z0-9_-]*\\.({})|{})$", device_actions.join("|"), builtin.join("|")),
        }),
    );
    properties.insert(
        "after".into(),
        json!({ "anyOf": [ { "type": "array", "items": { "type": "string" } }, { "type": "string" } ],
                "description": "Ids of steps this one waits for, instead of the previous step." }),
    );
    properties.insert(
        "repeat".into(),
        json!({
            "type": "object", "additionalProperties": false, "required": ["times"],
            "properties": {
                "times": arg_schema(ArgType::Integer { min: 1, max: 100_000 }, "How many times."),
                "every": quantity_schema(Dimension::Time),
            },
        }),
    );
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["do"],
        "properties": properties,
    })
}

fn strip_description(v: &Value) -> Value {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.remove("description");
    }
    v
}

pub fn protocol_schema() -> Value {
    let kinds: Vec<&str> = DeviceKind::ALL.iter().map(|k| k.name()).collect();
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": "https://biofoundry.dev/schema/protocol-1.json",
        "title": "biofoundry protocol, format 1",
        "type": "object",
        "additionalProperties": false,
        "required": ["format", "protocol"],
        "properties": {
            "format": { "const": FORMAT },
            "protocol": {
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {
                    "name": { "type": "string" },
                    "version": { "type": "string" },
                    "description": { "type": "string" },
                    "authors": { "type": "array", "items": { "type": "string" } },
                    "on_error": { "type": "string", "enum": crate::catalogue::ERROR_POLICIES },
                    "retries": { "type": "integer", "minimum": 0, "maximum": 100 },
                },
            },
            "params": {
                "type": "object",
                "description": "Defaults, overridable with --param name=value; use as \"${name}\".",
                "additionalProperties": { "type": ["string", "number", "boolean"] },
            },
            "devices": {
                "type": "object",
                "description": "Roles this protocol needs -> device kind.",
                "additionalProperties": {
                    "anyOf": [
                        { "type": "string", "enum": kinds },
                        { "type": "object", "additionalProperties": false, "required": ["kind"],
                          "properties": { "kind": { "type": "string", "enum": kinds },
                                          "at": { "type": "string", "description": "Deck slot of a module, `<liquid handler role>:<slot>`." } } },
                    ],
                },
            },
            "labware": {
                "type": "object",
                "additionalProperties": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "type": { "type": "string", "description": "Built-in labware (Opentrons load name).", "examples": builtin_names() },
                        "definition": { "type": "string", "description": "Opentrons labware schema 2 JSON file, relative to the protocol." },
                        "at": { "type": "string", "description": "`<role>:<slot>`", "pattern": "^[^:]+:.+$" },
                        "contents": { "type": "object", "description": "well or range -> \"<volume> <liquid>\"",
                                      "additionalProperties": { "type": "string" } },
                        "note": { "type": "string" },
                    },
                },
            },
            "step": { "type": "array", "items": step_schema() },
            "monitor": {
                "type": "array",
                "items": {
                    "type": "object", "additionalProperties": false, "required": ["device", "read", "every"],
                    "properties": {
                        "id": { "type": "string" },
                        "device": { "type": "string", "description": "A role from [devices]." },
                        "read": { "type": "array", "items": { "type": "string" } },
                        "every": quantity_schema(Dimension::Time),
                        "limits": { "type": "object", "additionalProperties": { "type": "string", "pattern": "\\.\\." } },
                        "on_violation": { "type": "string", "enum": VIOLATION_POLICIES },
                        "after": { "type": "string", "description": "Start sampling when this step completes (default: when the run starts)." },
                        "until": { "type": "string", "description": "Stop sampling when this step starts (default: when the run ends)." },
                    },
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_covers_every_action_argument() {
        let s = protocol_schema();
        let props = &s["properties"]["step"]["items"]["properties"];
        for k in DeviceKind::ALL {
            for a in k.spec().actions {
                for arg in a.args {
                    assert!(props.get(arg.name).is_some(), "{k}.{} {}", a.name, arg.name);
                }
                assert!(props["do"]["pattern"].as_str().unwrap().contains(a.name));
            }
        }
        // `to` is wells for transfer and a place for unload.
        assert!(
            props["to"]["anyOf"]
                .as_array()
                .is_some_and(|a| a.len() == 2)
        );
    }
}
