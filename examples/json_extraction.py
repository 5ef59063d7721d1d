"""Constrained extraction: JSON that follows a schema (a dict or a pydantic model), a regex, typed
values (``gen_int``, ``dtype=bool``). The output is valid whatever the model's weights.

    python examples/json_extraction.py
"""

import json

from pydantic import BaseModel, Field

import radixlm as sgl
from common import default_backend


class Contact(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    email_domain: str = Field(max_length=20)


TEXT = "Hi, I am Maria Lopez, 34 years old; write to maria.lopez@example.org or call +1 555 0100."


@sgl.function
def extract(s, text):
    s += "Extract the contact details from the text.\nText: " + text + "\n"
    s += "Contact: " + sgl.gen("contact", json_schema=Contact, max_tokens=96) + "\n"
    s += "Phone (digits only): " + sgl.gen("phone", regex=r"\+?[0-9]{1,3} [0-9]{3} [0-9]{4}", max_tokens=16)
    s += "\nNumber of people: " + sgl.gen_int("people", max_tokens=4)
    s += "\nIs an email present? " + sgl.gen("has_email", dtype=bool, max_tokens=3)


def main() -> None:
    with default_backend():
        st = extract.run(text=TEXT, temperature=0)
        contact = Contact.model_validate(json.loads(st["contact"]))
        print("contact:", contact)
        print("phone:", st["phone"], "| people:", int(st["people"]), "| has_email:", st["has_email"])


if __name__ == "__main__":
    main()
