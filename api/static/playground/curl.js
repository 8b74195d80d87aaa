// A job as the curl command that submits it again: JSON for txt2img, a multipart form for the image tasks, whose
// image and mask are files the command names. The API key stays out of the text: it reads $SDQ_API_KEY.

function quote(text) {
  return `'${String(text).replaceAll("'", "'\\''")}'`;
}

// `request`: the body the page sent, without image and mask; `seed`: the seed the job used, so that the command
// makes the same images.
export function curlCommand({ endpoint, request, seed, withKey, hasMask }) {
  const url = new URL(endpoint, location.href).href;
  const body = { ...request, seed };
  delete body.preview_every; // previews are for watching the job here
  const lines = [`curl -s ${quote(url)}`];
  if (withKey) lines.push(`-H "Authorization: Bearer $SDQ_API_KEY"`);
  if (endpoint.endsWith("txt2img")) {
    lines.push(`-H 'Content-Type: application/json'`, `-d ${quote(JSON.stringify(body))}`);
  } else {
    lines.push("-F image=@image.png");
    if (hasMask) lines.push("-F mask=@mask.png");
    for (const [name, value] of Object.entries(body)) {
      // --form-string: a prompt that starts with @ or < is text, not a file to read
      lines.push(`--form-string ${quote(`${name}=${typeof value === "object" ? JSON.stringify(value) : value}`)}`);
    }
  }
  return lines.join(" \\\n  ");
}
