// The job form: modes, the fields' defaults and ranges taken from the server's OpenAPI schema, and the request
// body built from what is filled in. Fields left empty are not sent, so the server's defaults apply.

const ENDPOINTS = { txt2img: "v1/txt2img", img2img: "v1/img2img", inpaint: "v1/inpaint", outpaint: "v1/inpaint" };
const SCHEMAS = { txt2img: "Txt2ImgRequest", img2img: "Img2ImgRequest", inpaint: "InpaintRequest",
  outpaint: "InpaintRequest" };
const PREVIEWS = 10; // about this many live previews per job, whatever its step count

export class JobForm {
  constructor(form) {
    this.form = form;
    this.schemas = null;
    this.catalog = null; // a Catalog (catalog.js): the LoRAs chosen
    this.fields = [...form.querySelectorAll("[data-field]")];
    this.margins = [...form.querySelectorAll("[data-outpaint]")];
    for (const radio of form.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => this.showMode());
    }
    for (const name of ["width", "height"]) { // a size typed by the person wins over the model's native one
      form.elements[name].addEventListener("input", (event) => {
        event.target.dataset.typed = String(event.target.value !== "");
      });
    }
  }

  get mode() {
    return this.form.querySelector('input[name="mode"]:checked').value;
  }

  set mode(mode) {
    this.form.querySelector(`input[name="mode"][value="${mode}"]`).checked = true;
    this.showMode();
  }

  endpoint() {
    return ENDPOINTS[this.mode];
  }

  // The OpenAPI document's component schemas: each field gets its range and enum, and its default as value.
  applySchema(openapi) {
    this.schemas = openapi.components.schemas;
    const inputs = [...this.fields.map((i) => [i, SCHEMAS.txt2img, i.dataset.field]),
      ...this.margins.map((i) => [i, "Outpaint", i.dataset.outpaint])];
    for (const [input, model, name] of inputs) {
      const schema = this.property(model, name); // fields of the image modes only: set by showMode
      this.describe(input, schema);
      this.setDefault(input, schema);
    }
    this.showMode();
  }

  // Server limits the schema does not carry (GET /v1/limits).
  applyLimits(limits) {
    for (const name of ["width", "height"]) this.form.elements[name].step = String(limits.side_multiple);
  }

  // The schema of `name` in `model`: a nullable field's non-null branch, an enum behind its $ref.
  property(model, name) {
    const properties = this.schemas?.[model]?.properties ?? {};
    if (!(name in properties)) return null;
    let schema = properties[name];
    const branch = (schema.anyOf ?? []).find((s) => s.type !== "null");
    if (branch) schema = { ...branch, ...schema, anyOf: undefined };
    if (schema.$ref) schema = { ...this.schemas[schema.$ref.split("/").pop()], ...schema };
    return schema;
  }

  describe(input, schema) {
    if (!schema) return;
    if (input.tagName === "SELECT") {
      input.replaceChildren(...(schema.enum ?? []).map((value) => new Option(value, value)));
      return;
    }
    if (schema.minimum !== undefined) input.min = String(schema.minimum);
    if (schema.maximum !== undefined) input.max = String(schema.maximum);
    if (schema.maxLength !== undefined) input.maxLength = schema.maxLength;
  }

  setDefault(input, schema) {
    input.value = schema && schema.default !== undefined && schema.default !== null ? String(schema.default) : "";
  }

  // Shows the parts of the current mode; the defaults that differ between modes follow it (strength, and the
  // size, which img2img and inpaint take from the image unless given).
  showMode() {
    const mode = this.mode;
    for (const part of this.form.querySelectorAll("[data-modes]")) {
      const shown = part.dataset.modes.split(" ").includes(mode);
      part.hidden = !shown;
      for (const control of part.querySelectorAll("input, select, textarea, button")) control.disabled = !shown;
    }
    if (!this.schemas) return;
    const model = SCHEMAS[mode];
    for (const name of ["strength", "mask_blur"]) {
      const schema = this.property(model, name);
      if (schema) {
        this.describe(this.form.elements[name], schema);
        this.setDefault(this.form.elements[name], schema);
      }
    }
    for (const name of ["width", "height"]) {
      const input = this.form.elements[name];
      const schema = this.property(model, name);
      input.placeholder = mode === "txt2img" ? "" : "image's";
      if (mode !== "txt2img") input.value = "";
      else if (input.value === "") this.setDefault(input, schema);
    }
  }

  // A txt2img image of the model's native side (512, SDXL 1024) unless the person typed a size of their own.
  useSize(side) {
    if (!side || this.mode !== "txt2img") return;
    for (const name of ["width", "height"]) {
      const input = this.form.elements[name];
      if (input.dataset.typed !== "true") input.value = String(side);
    }
  }

  setSeed(seed) {
    this.form.elements.seed.value = seed === null || seed === undefined ? "" : String(seed);
  }

  // The request body of the current mode, without the images (see ImageInput.addTo).
  request() {
    const body = {};
    for (const input of this.fields) {
      if (input.disabled || input.value.trim() === "") continue;
      const schema = this.property(SCHEMAS[this.mode], input.dataset.field);
      if (!schema) continue;
      body[input.dataset.field] = schema.type === "integer" || schema.type === "number" ? Number(input.value)
        : input.value;
    }
    if (this.mode === "outpaint") {
      body.outpaint = {};
      for (const input of this.margins) {
        if (input.value.trim() !== "") body.outpaint[input.dataset.outpaint] = Number(input.value);
      }
    }
    const model = this.catalog?.chosenModel() ?? null;
    if (model) body.model = model;
    const loras = this.catalog?.chosen() ?? [];
    if (loras.length) body.loras = loras;
    if (this.form.elements.previews.checked) {
      const steps = body.steps ?? this.property(SCHEMAS[this.mode], "steps")?.default ?? PREVIEWS;
      body.preview_every = Math.max(1, Math.round(steps / PREVIEWS));
    }
    return body;
  }
}
