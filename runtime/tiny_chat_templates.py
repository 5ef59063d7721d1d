"""Chat templates for ``radixlm make-tiny-model --chat-template-family``: one per tool-call / reasoning family.

Each writes its family's wire format (the strings the matching parser in ``runtime/parsers`` reads, and the
markers ``detect_parser`` looks for), so every parser can be tested end to end on a hub-free model. They are
written for this project (not copies of the vendors' files): the formats are the families', the prose is ours.
Tool calls in the history are rendered from ``{"function": {"name", "arguments"}}`` with arguments as a dict
(or a JSON string, written as is); tool results from ``role: "tool"`` messages.
"""

from __future__ import annotations

# ChatML without tools: the default, unchanged from the first tiny models.
CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_ARGS = "(fn.arguments if fn.arguments is string else fn.arguments | tojson)"

# Hermes-style calls in ChatML (Qwen2.5). ``THINK`` variants add Qwen3's reasoning block.
_HERMES_BODY = (
    "{{ bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures are inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nWrite each call as a JSON object with the name and arguments inside <tool_call></tool_call>:"
    "\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content or '' %}"
    "@@STRIP_THINK@@"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' + " + _ARGS + " + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}@@GEN_THINK@@{%- endif %}"
)
QWEN25 = _HERMES_BODY.replace("@@STRIP_THINK@@", "").replace("@@GEN_THINK@@", "")
QWEN3 = _HERMES_BODY.replace(
    "@@STRIP_THINK@@",
    # Earlier turns keep only their answer, as Qwen3's own template does.
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}",
).replace("@@GEN_THINK@@", "{%- if enable_thinking is defined and not enable_thinking %}"
                           "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")

# Llama 3.1 JSON tool calls: tools in the system turn, results in the ``ipython`` role.
LLAMA3 = (
    "{{ bos_token }}"
    "{%- set system = messages[0].content if messages[0].role == 'system' else '' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system }}"
    "{%- if tools %}"
    "{{- '\\n\\nYou can call these functions. To call one, reply with only a JSON object '"
    " + '{\"name\": function name, \"parameters\": dictionary of argument name and value}; '"
    " + 'separate several calls with \"; \".\\n' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{{- '{\"name\": \"' + fn.name + '\", \"parameters\": ' + " + _ARGS + " + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + (message.content or '') + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral v3: tools before the last user turn, all calls of a turn in one [TOOL_CALLS] array.
MISTRAL = (
    "{{ bos_token }}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- set system = messages[0].content if messages[0].role == 'system' else '' %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}"
    "{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}"
    "{{- '[INST] ' + ((system + '\\n\\n') if system and loop.index0 == ns.last_user else '') + message.content"
    " + '[/INST]' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '[TOOL_CALLS] [' }}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if not loop.first %}{{- ', ' }}{%- endif %}"
    "{{- '{\"name\": \"' + fn.name + '\", \"arguments\": ' + " + _ARGS + " + ', \"id\": \"' + (call.id or '') + '\"}' }}"
    "{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- ' ' + (message.content or '') + eos_token }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + (message.content | tojson) + ', \"call_id\": \"' "
    "+ (message.tool_call_id or '') + '\"}[/TOOL_RESULTS]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# DeepSeek-R1: the generation prompt opens the reasoning block, so replies start inside it.
DEEPSEEK_R1 = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{- message.content }}"
    "{%- elif message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content or '' %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

FAMILIES = {
    "chatml": CHATML,
    "qwen25": QWEN25,
    "qwen3": QWEN3,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "deepseek-r1": DEEPSEEK_R1,
}

# Markers each family's tokenizer holds as single tokens (appended after the trained vocabulary).
FAMILY_TOKENS = {
    "qwen25": ("<tool_call>", "</tool_call>"),
    "qwen3": ("<tool_call>", "</tool_call>", "<think>", "</think>"),
    "mistral": ("[TOOL_CALLS]",),
    "deepseek-r1": ("<think>", "</think>"),
}
