{{/* Name of every object of this release (the RayCluster too). */}}
{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "splitserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Scrape annotations for Prometheus without the Operator. */}}
{{- define "splitserve.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.pool.router.http_port | default 8000 | quote }}
prometheus.io/path: /metrics
{{- end -}}

{{/*
The pool config as rendered into pool.yaml: `pool` with each role's
engine.tensor_parallel_size taken from workerGroups.<role>.tensorParallelSize (one place to
set it; a different value written in the pool itself is refused).
*/}}
{{- define "splitserve.pool" -}}
{{- $pool := deepCopy .Values.pool -}}
{{- range $role := list "prefill" "decode" -}}
{{- $tp := int (index $.Values.workerGroups $role).tensorParallelSize -}}
{{- $section := index $pool $role -}}
{{- $engine := $section.engine | default dict -}}
{{- if and (hasKey $engine "tensor_parallel_size") (ne (int $engine.tensor_parallel_size) $tp) -}}
{{- fail (printf "pool.%s.engine.tensor_parallel_size %v disagrees with workerGroups.%s.tensorParallelSize %d: set it in workerGroups only" $role $engine.tensor_parallel_size $role $tp) -}}
{{- end -}}
{{- $_ := set $engine "tensor_parallel_size" $tp -}}
{{- $_ := set $section "engine" $engine -}}
{{- end -}}
{{- toYaml $pool -}}
{{- end -}}

{{/*
A worker group of the RayCluster. Called with (dict "root" $ "role" "prefill"); GPUs and Ray
custom resources come from the pool config and the group's tensorParallelSize, so they always
match what the actors ask for: a worker is tensorParallelSize ranks of pool.<role>.num_gpus
each, its custom resources asked for once.
*/}}
{{- define "splitserve.workerGroup" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $group := index $root.Values.workerGroups $role -}}
{{- $pool := index $root.Values.pool $role -}}
{{- $perPod := int $group.workersPerPod -}}
{{- $tp := int $group.tensorParallelSize -}}
{{- $rayService := eq $root.Values.kind "RayService" -}}
{{- /* mulf: `mul` truncates each factor to an integer (num_gpus 0.5 would give 0 GPUs). */ -}}
{{- if and (gt $tp 1) (not (has (float64 ($pool.num_gpus | default 0)) (list 0.0 1.0))) -}}
{{- fail (printf "pool.%s.num_gpus %v with workerGroups.%s.tensorParallelSize %d: each rank takes one whole GPU; set num_gpus: 1 (per rank), or 0 on CPU" $role $pool.num_gpus $role $tp) -}}
{{- end -}}
{{- $gpusf := mulf $perPod $tp ($pool.num_gpus | default 0) -}}
{{- if ne $gpusf (floor $gpusf) -}}
{{- fail (printf "workerGroups.%s: workersPerPod %d x tensorParallelSize %d x pool.%s.num_gpus %v = %v GPUs per pod; make it a whole number" $role $perPod $tp $role $pool.num_gpus $gpusf) -}}
{{- end -}}
{{- $gpus := int $gpusf -}}
{{- if not (and (le (int $group.minReplicas) (int $group.replicas)) (le (int $group.replicas) (int $group.maxReplicas))) -}}
{{- fail (printf "workerGroups.%s: need minReplicas <= replicas <= maxReplicas, got %v, %v, %v" $role $group.minReplicas $group.replicas $group.maxReplicas) -}}
{{- end -}}
{{- if lt (mul $group.maxReplicas $perPod) (int ($pool.max_replicas | default 0)) -}}
{{- fail (printf "workerGroups.%s: maxReplicas %v pods x workersPerPod %d < pool.%s.max_replicas %v: the Ray autoscaler could not place them all; raise maxReplicas" $role $group.maxReplicas $perPod $role $pool.max_replicas) -}}
{{- end -}}
{{- $res := dict -}}
{{- range $name, $amount := ($pool.resources | default dict) -}}
{{- $_ := set $res $name (mul $perPod $amount) -}}
{{- end -}}
- groupName: {{ $role }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    metrics-export-port: "8080"
    {{- if $res }}
    # Custom Ray resources the {{ $role }} actors ask for (escaped JSON in quotes: the form
    # KubeRay and the Ray autoscaler parse).
    resources: {{ printf "\"%s\"" (toJson $res | replace "\"" "\\\"") | squote }}
    {{- end }}
    {{- if not $gpus }}
    num-gpus: "0"
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "splitserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
    spec:
      terminationGracePeriodSeconds: 60
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "splitserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          args: ['ulimit -n 65536; exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"']
          {{- with $root.Values.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - {name: metrics, containerPort: 8080}
          {{- if $rayService }}
          # RayService: KubeRay's default probe would also want a Ray Serve proxy on this pod,
          # and the gate runs none here (proxy_location: HeadOnly). Ray only, as for a RayCluster.
          readinessProbe:
            exec:
              command: ["bash", "-c", "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"]
            initialDelaySeconds: 10
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 10
          {{- end }}
          resources:
            requests:
              {{- with $group.resources.requests }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              {{- if $gpus }}
              nvidia.com/gpu: {{ $gpus | quote }}
              {{- end }}
            limits:
              {{- with $group.resources.limits }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              {{- if $gpus }}
              nvidia.com/gpu: {{ $gpus | quote }}
              {{- end }}
          volumeMounts:
            - {name: models, mountPath: {{ $root.Values.models.mountPath }}, readOnly: true}
            - {name: dshm, mountPath: /dev/shm}
      volumes:
        - name: models
          persistentVolumeClaim:
            claimName: {{ $root.Values.models.existingClaim }}
            readOnly: true
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $group.shmSize }}
{{- end -}}
