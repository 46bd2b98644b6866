// Teachers and datasets never change once uploaded: one request per id for the whole session.

import { api } from "./api.js";

const teachers = new Map();
const datasets = new Map();

function cached(map, path, id) {
  if (!id) return Promise.resolve(null);
  if (!map.has(id)) {
    const p = api(`${path}/${encodeURIComponent(id)}`).catch(() => {
      map.delete(id); // a failed look-up (network, key) may work next time
      return null;
    });
    map.set(id, p);
  }
  return map.get(id);
}

/** The teacher (TeacherOut) or null when it cannot be read. */
export const getTeacher = (id) => cached(teachers, "/v1/teachers", id);

/** The dataset (DatasetOut) or null when it cannot be read. */
export const getDataset = (id) => cached(datasets, "/v1/datasets", id);

/** Remember an object the page already has (a fresh upload, a listing). */
export function remember(kind, obj) {
  (kind === "teacher" ? teachers : datasets).set(obj.id, Promise.resolve(obj));
}

/** What to call a teacher's architecture: its arch, or its format for ONNX/TorchScript files that have none. */
export function teacherArch(teacher) {
  if (!teacher) return null;
  return teacher.arch || `${teacher.format} file`;
}
