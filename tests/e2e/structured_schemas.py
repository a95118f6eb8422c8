"""Twenty JSON schemas of different shapes for the structured output tests: nested objects, arrays,
enums, bounded numbers, required and optional properties. Strings are bounded so that a small model's
output ends within the tests' max_tokens."""

S = {"type": "string", "maxLength": 16}
INT = {"type": "integer", "minimum": 0, "maximum": 999}

SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": S, "country": S}, "required": ["city"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["score"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": INT, "name": S},
                                               "required": ["id", "name"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genre": {"enum": ["fiction", "science", "history"]}},
     "required": ["title", "year", "genre"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "number", "minimum": -90,
                                                                          "maximum": 90},
                                                "minItems": 2,
                                                "maxItems": 2}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}},
     "required": ["status", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": INT}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [INT, {"type": "string", "maxLength": 8}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"name": S, "nickname": S, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 99}},
     "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 50},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"],
     "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "minItems": 1, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 2}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"}, "reason": S}, "required": ["answer", "reason"],
     "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1000, "maximum": 9999},
                                      "active": {"type": "boolean"}, "role": {"enum": ["admin", "user"]}},
     "required": ["id", "active", "role"], "additionalProperties": False},
]
